#include "NpcdSayAsyncAction.h"

#include "Engine/GameInstance.h"
#include "Engine/World.h"

UNpcdSayAsyncAction* UNpcdSayAsyncAction::SayLine(UObject* WorldContextObject, const FString& Persona,
                                                  const FString& Speaker, const FString& Line, const FString& NpcId,
                                                  int32 MaxTokens)
{
    UNpcdSayAsyncAction* Action = NewObject<UNpcdSayAsyncAction>();
    UWorld* World = GEngine->GetWorldFromContextObject(WorldContextObject, EGetWorldErrorMode::LogAndReturnNull);
    if (World != nullptr && World->GetGameInstance() != nullptr)
    {
        Action->Subsystem = World->GetGameInstance()->GetSubsystem<UNpcdSubsystem>();
        Action->RegisterWithGameInstance(World->GetGameInstance());
    }
    Action->Persona = Persona;
    Action->Speaker = Speaker;
    Action->Line = Line;
    Action->NpcId = NpcId;
    Action->MaxTokens = MaxTokens;
    return Action;
}

void UNpcdSayAsyncAction::Activate()
{
    npcd_request* Request = npcd_request_new(TCHAR_TO_UTF8(*Persona), TCHAR_TO_UTF8(*Line));
    if (Request != nullptr)
    {
        npcd_request_set_speaker(Request, TCHAR_TO_UTF8(*Speaker));
        npcd_request_set_npc_id(Request, TCHAR_TO_UTF8(*NpcId));
        npcd_request_set_priority(Request, NPCD_PRIORITY_PLAYER);
        if (MaxTokens > 0) npcd_request_set_max_tokens(Request, static_cast<uint32_t>(MaxTokens));
        if (Subsystem.IsValid()) RequestId = Subsystem->Submit(Request, this);
        npcd_request_free(Request);
    }
    if (RequestId.IsEmpty())
    {
        OnFailed.Broadcast(RequestId, 3, TEXT("the request was refused (no subsystem, or an invalid persona or line)"));
        SetReadyToDestroy();
    }
}

void UNpcdSayAsyncAction::Cancel()
{
    if (Subsystem.IsValid() && !RequestId.IsEmpty()) Subsystem->Cancel(RequestId);
}

void UNpcdSayAsyncAction::SetReadyToDestroy()
{
    if (Subsystem.IsValid() && !RequestId.IsEmpty()) Subsystem->Forget(RequestId);
    Super::SetReadyToDestroy();
}

void UNpcdSayAsyncAction::OnNpcdEvent(const npcd_event& Event)
{
    switch (Event.kind)
    {
    case NPCD_EVENT_TEXT_DELTA:
    {
        const FString Text = UTF8_TO_TCHAR(Event.text);
        FullText += Text;
        OnTextDelta.Broadcast(RequestId, Text, FullText);
        break;
    }
    case NPCD_EVENT_FINISHED:
        OnFinished.Broadcast(RequestId, UTF8_TO_TCHAR(Event.text), Event.finish_reason);
        SetReadyToDestroy();
        break;
    case NPCD_EVENT_ERROR:
        OnFailed.Broadcast(RequestId, Event.error_code, UTF8_TO_TCHAR(Event.text));
        SetReadyToDestroy();
        break;
    default:
        break;
    }
}
