#pragma once

#include "CoreMinimal.h"
#include "Kismet/BlueprintAsyncActionBase.h"
#include "NpcdSubsystem.h"
#include "NpcdSayAsyncAction.generated.h"

DECLARE_DYNAMIC_MULTICAST_DELEGATE_ThreeParams(FNpcdTextDelta, const FString&, RequestId, const FString&, Text, const FString&, FullText);
DECLARE_DYNAMIC_MULTICAST_DELEGATE_FourParams(FNpcdLineFinished, const FString&, RequestId, const FString&, Text, int32, Reason, const FString&, Json);
/** Code: a gRPC status code (14: the daemon is unreachable; 8: its queue is full, RetryAfterMs says when to ask again). */
DECLARE_DYNAMIC_MULTICAST_DELEGATE_FourParams(FNpcdLineFailed, const FString&, RequestId, int32, Code, const FString&, Message, int32, RetryAfterMs);

/** Which sentence events a line sends (npcd.v1.Segmentation): On Sentence, for text-to-speech. */
UENUM(BlueprintType)
enum class ENpcdSegmentation : uint8
{
    None = 0,
    /** One per sentence (. ! ? and their CJK, Arabic, Hindi kin). */
    Sentence = 1,
    /** Also at clause marks (, ; : and kin): shorter pieces, an earlier first one. */
    Clause = 2,
};

/**
 * An action valid right now. Only a Name: the persona's action of that name. With a
 * Description or ArgsSchemaJson (a JSON Schema of the arguments object): a new action.
 */
USTRUCT(BlueprintType)
struct NPCDCLIENT_API FNpcdActionSpec
{
    GENERATED_BODY()

    UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "npcd")
    FString Name;
    UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "npcd")
    FString Description;
    UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "npcd")
    FString ArgsSchemaJson;
};

/**
 * What else a line may carry; every field left at its default leaves the persona's setting.
 * History: earlier turns, for lines without a Conversation. Context: facts for the prompt
 * (location, time of day, quest state). DeadlineMs: the line ends (Reason 4) this long after it
 * is asked; 0: none. Temperature / TopP below 0: the persona's. Seed: a reproducible line when
 * bUseSeed. bAmbient: background chatter, served after the player's lines.
 */
USTRUCT(BlueprintType)
struct NPCDCLIENT_API FNpcdLineOptions
{
    GENERATED_BODY()

    UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "npcd")
    TArray<FNpcdTurn> History;
    UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "npcd")
    TMap<FString, FString> Context;
    UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "npcd", meta = (ClampMin = "0"))
    int32 DeadlineMs = 0;
    UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "npcd")
    float Temperature = -1.0f;
    UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "npcd")
    float TopP = -1.0f;
    UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "npcd")
    bool bUseSeed = false;
    UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "npcd", meta = (EditCondition = "bUseSeed"))
    int64 Seed = 0;
    UPROPERTY(EditAnywhere, BlueprintReadWrite, Category = "npcd")
    bool bAmbient = false;
};

/**
 * "NPC Say Line": asks an NPC of a persona for a line. The pins fire on the game thread as
 * the subsystem polls: On Text Delta for each piece, then On Finished (Reason: 1 stop,
 * 2 length, 3 cancelled, 4 deadline) or On Failed (a gRPC status code; 14: the daemon is
 * unreachable). A structured line (Structured, or "NPC Say Line With Actions") is JSON
 * {"say", "emotion", "action"}: "say" streams as text, On Emotion and On Action fire after
 * some of it, and On Finished carries the whole reply in Json ("" for a plain line).
 * With a Segmentation, On Sentence fires with each complete sentence (or clause) right after
 * the text that completed it, the last one right before On Finished. Conversation (often the
 * NPC id): the daemon keeps the turns and puts the earlier ones in the prompt. Options (an
 * advanced pin, "Make NpcdLineOptions"): history, context, deadline, sampling, priority.
 */
UCLASS()
class NPCDCLIENT_API UNpcdSayAsyncAction : public UBlueprintAsyncActionBase, public INpcdLineListener
{
    GENERATED_BODY()

public:
    UFUNCTION(BlueprintCallable, Category = "npcd", meta = (BlueprintInternalUseOnly = "true", WorldContext = "WorldContextObject", DisplayName = "NPC Say Line", AdvancedDisplay = "ResponseFormat,Conversation,Options", AutoCreateRefTerm = "Options"))
    static UNpcdSayAsyncAction* SayLine(UObject* WorldContextObject, const FString& Persona, const FString& Speaker,
                                        const FString& Line, const FString& NpcId, int32 MaxTokens,
                                        bool Structured, const FString& ResponseFormat,
                                        ENpcdSegmentation Segmentation,
                                        const FString& Conversation, const FNpcdLineOptions& Options);

    /** A structured line whose action is one of Actions (the persona's by name, or new ones). */
    UFUNCTION(BlueprintCallable, Category = "npcd", meta = (BlueprintInternalUseOnly = "true", WorldContext = "WorldContextObject", DisplayName = "NPC Say Line With Actions", AdvancedDisplay = "Conversation,Options", AutoCreateRefTerm = "Options"))
    static UNpcdSayAsyncAction* SayLineWithActions(UObject* WorldContextObject, const FString& Persona, const FString& Speaker,
                                                   const FString& Line, const FString& NpcId,
                                                   const TArray<FNpcdActionSpec>& Actions, int32 MaxTokens,
                                                   ENpcdSegmentation Segmentation,
                                                   const FString& Conversation, const FNpcdLineOptions& Options);

    /** Ends the line early; On Finished then fires with Reason 3 (cancelled). */
    UFUNCTION(BlueprintCallable, Category = "npcd")
    void Cancel();

    UPROPERTY(BlueprintAssignable)
    FNpcdTextDelta OnTextDelta;
    /** Structured lines: the action the NPC takes; ArgsJson is a JSON object ("{}" when it takes none). */
    UPROPERTY(BlueprintAssignable)
    FNpcdActionChosen OnAction;
    /** Structured lines: the emotion of the line, one of the persona's. */
    UPROPERTY(BlueprintAssignable)
    FNpcdEmotionChanged OnEmotion;
    /** Lines with a Segmentation: a complete sentence (or clause), for text-to-speech. */
    UPROPERTY(BlueprintAssignable)
    FNpcdSentenceReady OnSentence;
    UPROPERTY(BlueprintAssignable)
    FNpcdLineFinished OnFinished;
    UPROPERTY(BlueprintAssignable)
    FNpcdLineFailed OnFailed;

    virtual void Activate() override;
    virtual void SetReadyToDestroy() override;
    virtual void OnNpcdEvent(const npcd_event& Event) override;

private:
    static UNpcdSayAsyncAction* Make(UObject* WorldContextObject, const FString& Persona, const FString& Speaker,
                                     const FString& Line, const FString& NpcId, int32 MaxTokens,
                                     ENpcdSegmentation Segmentation, const FString& Conversation,
                                     const FNpcdLineOptions& Options);
    /** Sets Options' fields on Request; false when one is refused (invalid UTF-8, too long). */
    bool ApplyOptions(npcd_request* Request) const;

    TWeakObjectPtr<UNpcdSubsystem> Subsystem;
    FString Persona, Speaker, Line, NpcId, RequestId, FullText, ResponseFormat, Conversation;
    int32 MaxTokens = 0;
    ENpcdSegmentation Segmentation = ENpcdSegmentation::None;
    bool bStructured = false;
    TArray<FNpcdActionSpec> Actions;
    FNpcdLineOptions Options;
};
